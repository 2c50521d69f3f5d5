"""Reports: queries over the delivery log and writers for them."""
