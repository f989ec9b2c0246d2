"""The front doors: thin protocol modules, each its pydantic models and its routes over the one
generation flow (sdserve.generation). deps.py holds what routes declare they need."""
