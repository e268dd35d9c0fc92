"""What the router reports about itself: metrics, traffic windows, the access log."""
