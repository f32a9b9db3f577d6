from t2i.demo.run import cli

cli()
