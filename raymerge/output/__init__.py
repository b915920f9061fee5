"""Everything the output directory holds: shards, index, config, card, manifest."""
