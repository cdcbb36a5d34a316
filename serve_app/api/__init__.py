"""HTTP surfaces of the ingress, one module per endpoint group."""
