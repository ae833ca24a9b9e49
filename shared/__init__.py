"""Everything both the trainer and the services need. Imports nothing from services/ or trainer/."""
