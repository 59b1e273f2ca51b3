"""The shipped recipes (YAML files beside this one), found by name: `sparamx prune --recipe wanda-50`."""
