"""State encoders, one module each, registered in :data:`recloop.encoders.base.ENCODERS`."""
