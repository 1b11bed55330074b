"""The demo page (`/demo/`): watch your own stream in the browser and publish test events. Off the hot path."""
