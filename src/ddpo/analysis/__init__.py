"""Analysis of finished runs: `ddpo compare`'s tables and figures over a log directory."""
