"""Commands on finished runs and sweeps: export, bench, predict, sweep, report, peers."""
