"""``ray.util`` counterparts: scheduling strategies (more to come)."""
