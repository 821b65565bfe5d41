"""The backup routes: one module per route family (upload, listing, download and links,
delete), and what they share.

Owns the hierarchy rules that decide who may act on a system (`authorization`), upload
rates and retention, storage calls under the gate with metrics (`storage`, and the store's
app key) and the audit lines. It may import every lower package: `gateway.config`,
`telemetry`, `identity`, `directory`, `http`, and `storage_backends`.
"""
