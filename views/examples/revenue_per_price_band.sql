-- Revenue per hour and band of the unit price, with the lowest and the
-- highest unit price seen in the band.
-- readers: dashboard
SELECT date_trunc('hour', e.event_time) AS hour,
       CASE WHEN e.price_cents < 1000 THEN 'under 10.00'
            WHEN e.price_cents < 5000 THEN '10.00 to 49.99'
            ELSE '50.00 and over' END AS price_band,
       count(*) AS purchases,
       sum(CAST(e.quantity AS BIGINT) * e.price_cents) AS revenue_cents,
       min(e.price_cents) AS lowest_price_cents,
       max(e.price_cents) AS highest_price_cents
FROM events AS e
WHERE e.event_type = 'purchase'
GROUP BY 1, 2
