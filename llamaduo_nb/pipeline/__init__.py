"""The run machinery: params, the unit contract, the runner, the cycle, the dry-run plan."""
