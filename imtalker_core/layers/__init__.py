"""Building blocks shared by the renderer and the generator, under the official attribute names."""
