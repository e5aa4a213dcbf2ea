"""The failure catalogue (README "Failure policy"): bad inputs and faults, one test each,
grouped by class. Each test's name says the case and what must happen; a reader can scan
this file as a table. Every case checks that nothing wrong is recorded or reported as
right, and that the message names the problem and the fix.

Classes: 1 divergence, 2 report integrity, 3 provenance, 4 values outside their meaning,
5 signals, 6 files and disks, 7 sweep bookkeeping, 8 output a person reads.
"""

from __future__ import annotations

# ==================================================================== 1. divergence
# (trainer: flexexp/trainer.py, flexexp/rundir.py)


# ==================================================================== 3. provenance


# ==================================================================== 4. values


# ==================================================================== 5. signals


# ==================================================================== 7. sweeps


# ==================================================================== 8. output
