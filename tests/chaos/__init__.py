"""The chaos suite (issue 8, item 7): load, faults, then a check of every acknowledgement.

Client processes write sessions, cache entries and workflow steps and log
every acknowledged operation; a fault thread kills, freezes and restarts
redis-server and the daemon meanwhile; two daemons on one Redis hand out
locks to contender processes that log every holding. Once everything has
settled, ``checker`` compares the last acknowledged value of every key with
what wksd and Redis hold, and the lock log with the fail-closed promise.

Run it with ``python -m tests.chaos`` (``--duration`` for a longer run), or
through pytest (``test_chaos.py``, marker ``chaos``). ``scenarios`` holds the
runs, ``procs`` the processes under test, ``clients`` the load processes,
``faults`` the fault thread.
"""
