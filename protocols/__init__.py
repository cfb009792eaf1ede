"""Protocol adapters: decode and validate at the boundary, publish to ingress, map errors to statuses."""
