"""`chorus bench`: a load sweep through the gateway, measured as listeners hear it."""
