"""Programs the lab's catalog runs for images that have no Debian counterpart (see ``..catalog``)."""
