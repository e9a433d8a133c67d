// Data sets: placeholder until the loaders land.
