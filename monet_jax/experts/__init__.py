"""Expert tools: the microscope (which composed experts a token uses) and, later, the scalpel."""
