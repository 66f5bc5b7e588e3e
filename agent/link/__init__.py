"""The link to the broker: a thin typed wrapper over paho-mqtt (``mqtt``) and TLS contexts (``tls``)."""
