"""Channel adapters: one module per provider behind the contract in `base`."""
