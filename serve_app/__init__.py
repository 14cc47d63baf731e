"""mrt-serve: Magenta RealTime 2 on Ray Serve. Importable without Ray."""
