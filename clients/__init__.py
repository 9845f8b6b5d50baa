"""Python clients for the Wombat services (thin, typed wrappers over the generated stubs)."""
