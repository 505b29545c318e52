"""kombu transports: one module per broker."""
