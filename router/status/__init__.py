"""``python -m router.status``: every instance of a stack at a glance, and ``--wait`` for it to come up.

An operator (or a deploy script) asks two questions after ``supervisord -c``:
is everything up, and if not, which engine failed and why. The answers are
split between supervisord (process state, uptime, the log file) and the
router (health, residency, load); this tool asks both and shows one row per
instance, saying which source did not answer instead of failing.

- snapshot.py: one reading of both sources, typed
- view.py: that reading as a rich table, plain lines or JSON
- wait.py: the --wait verdict (ready, failed, still coming up)
- cli.py: the command line
"""
