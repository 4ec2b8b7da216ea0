"""Starting many rank processes (through mpirun, from a rank table, as local children) and watching them."""
