"""Compilation: vamc build configs and builds, and AOTInductor packages of the runtime's graphs."""
