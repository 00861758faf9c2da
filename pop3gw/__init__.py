"""pop3-gw: the authenticated POP3 proxy (main, gateway, session, upstream,
relay) and authmgr, the administrator's tool for its APOP user database."""
