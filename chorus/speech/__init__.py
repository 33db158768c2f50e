"""What speech is to Chorus: the Orpheus token protocol, the voices, the audio formats
a client may ask for, and the limits a synthesis request must keep. Every service reads
these same tables, so the gateway, the token server and the codec workers cannot disagree."""
