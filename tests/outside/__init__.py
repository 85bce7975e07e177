"""Parts defined outside ssdjax, for the registry tests."""
