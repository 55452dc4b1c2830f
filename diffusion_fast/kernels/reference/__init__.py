"""The reference backend: short, float32 math, the semantics every other backend must match."""
