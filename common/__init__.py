"""mailwall: the mail proxies of a firewall host (smap, smapd, pop3-gw, authmgr).

This package holds what two or more programs share.  It trusts nothing that
arrives from the network or the spool; it trusts the netperm-table only after
common.netperm has checked it.
"""

__version__ = "0.1.0"
