"""Building blocks shared by several methods: coreset sampling, nearest-neighbour search, patch embeddings."""
