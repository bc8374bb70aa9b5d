"""The demo chat model's world: a seeded dialogue generator over a few skills, its tables, and its evaluation."""
