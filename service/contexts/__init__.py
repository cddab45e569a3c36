"""Business logic, one module per resource; routes and tasks call these."""
