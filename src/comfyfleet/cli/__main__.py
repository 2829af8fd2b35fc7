from comfyfleet.cli.main import app

app()
