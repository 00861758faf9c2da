"""smapd: delivers the spool that smap wrote (scanner, delivery agent, checks, state, bounces)."""
