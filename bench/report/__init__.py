"""Records -> tables and figures."""
