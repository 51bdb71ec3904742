"""The web console: another edge over the same service, served by `hsmbridge serve` at `/console/`.

A person signs in with an access key pair of the `credentials` file and then acts as that
principal: every page and form runs KMS operations through `protocol.operations` with a
`RequestContext` for the principal (edge "console"), so key policies and IAM decide exactly as for
an API call, and each operation writes the same audit-trail line (`trail.calls`).

Modules: `app` (the ASGI sub-app: routing, sign-in, session and CSRF checks), `web` (requests,
responses, cookies, forms), `session` (signed session cookies and CSRF tokens), `calls` (running
one operation as the principal, audited), `render` (Jinja2 templates), `directory` (IAM users
and roles, cluster facts), `wizard` (the "Create key" wizard's state and rules), `pages` (the
keys, key detail and custom key store pages), `troubleshooting` (connection error texts) and
`compose` (built from the service by the HTTP edge's composition).
Must not import uvicorn (the HTTP edge serves it) or pkcs11.
"""
