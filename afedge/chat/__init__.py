"""`afedge chat`: a conversation whose recurrent state carries every turn, over any runtime Session."""
