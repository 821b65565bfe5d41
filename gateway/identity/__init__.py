"""Identity: who is calling. Access-token verification and minting, signing keys, the
principal, and appliances' own Basic credentials (the platform's salted-sha256 secrets).

Owns python-jose (no other module imports it), the HMAC secret file, and the `Principal`
value with its request key. It knows nothing of HTTP answers: refusals are typed exceptions
that `gateway.http` maps to statuses. It may import `gateway.config` and `gateway.telemetry`.
"""
