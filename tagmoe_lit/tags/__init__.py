"""Task tags: schemas (levels → tags with fixed ids)."""

from tagmoe_lit.tags.schema import TagSchema, TagSchemaError, shipped_schemas

__all__ = ["TagSchema", "TagSchemaError", "shipped_schemas"]
