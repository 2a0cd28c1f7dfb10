"""The small core every stage stands on: errors, settings, manifest, cells, figures, storage, checkpoint, tracking,
runtime, memory, reaper. It imports only `fm`, the standard library and third-party packages."""
