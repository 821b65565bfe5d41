"""Locust load test for ops who use locust: each user deletes distinct seeded backups.

    .venv/bin/backup-gateway seed --config bench.yaml --systems 50 --backups 2000 --ids-out ids.txt
    TOKEN=$(.venv/bin/backup-gateway token --config bench.yaml --org org_owner --role owner)
    IDS_FILE=ids.txt TOKEN=$TOKEN locust -f bench/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 64 -r 64 -t 30s

Every id is handed out once; when they run out, users stop. A 200 is a success, anything
else a failure (so a failure rate above zero means something to look at).
"""

from __future__ import annotations

import os
from collections import deque

from locust import FastHttpUser, task
from locust.exception import StopUser

with open(os.environ.get("IDS_FILE", "ids.txt"), encoding="ascii") as ids_file:
    PATHS = deque(
        f"/api/systems/{sid}/backups/{bid}"
        for sid, bid in (line.split() for line in ids_file if line.strip())
    )
TOKEN = os.environ["TOKEN"]


class Deleter(FastHttpUser):
    @task
    def delete_one(self) -> None:
        try:
            path = PATHS.popleft()
        except IndexError:
            raise StopUser() from None
        self.client.delete(
            path,
            headers={"Authorization": f"Bearer {TOKEN}"},
            name="/api/systems/{id}/backups/{backup_id}",
        )
