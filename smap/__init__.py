"""smap: the SMTP receiver that faces the Internet (DESIGN §5)."""
