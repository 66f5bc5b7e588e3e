"""The web dashboard of ``edge-fleet server`` (issue 26): a hand-written page in ``static/`` (no
build step, nothing from a CDN), browser sessions (``session``), the few API routes the page
needs besides ``/api/v1/`` (``api``, ``jobs_stream``) and the telemetry history (``history``).
``mount.mount(app)`` adds it all to the server's app.  (Kept free of imports: ``auth`` imports
``session`` from here.)"""
