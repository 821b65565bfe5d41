"""Tools behind the CLI that fill storage: demo backups for `make run`, `seed` for load tests.

Never used while serving. It may import `gateway.config`, `gateway.directory` and
`storage_backends`.
"""
