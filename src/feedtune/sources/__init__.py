"""What the user's images are: listings, decoding and checks, the split, inspection."""
