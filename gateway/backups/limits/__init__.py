"""Limits that hold across the gateway's processes (DESIGN.md §9, §11).

The bytes reserved by uploads in flight, the upload rate and the brake on failed appliance
logins are kept in the platform's Redis when `redis.url` is set (keys of our own, beside
the platform's `backup:rate:*`), and otherwise in one SQLite file under `server.state_dir`
that the workers of a host share (`host_file`). While Redis cannot answer, each process
keeps them for itself, and says so in its log.
"""
